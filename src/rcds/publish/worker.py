"""A local repository's publish worker: dispatches queued jobs into ingest slots, each under a lease on
its CID's path, and grafts what they staged into one revision per batch (group commit).

``RepositoryWorker`` is the service's (``rcds.publish.service``) per-repository thread; the slots and
leases are ``slots`` and ``leases``; what runs in a slot is ``stager`` (a big upload staged while it
arrives comes in through ``stage_early``, ``early``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..cvmfs.catalog import NESTED_MARKER
from ..cvmfs.errors import TreeError
from ..cvmfs.repository import Repository, RepositoryError
from ..cvmfs.writer import Transaction
from ..ingest.tarstream import IngestError
from ..logs import fields
from .cid import cid_group
from .lastuse import write_records
from .leases import Busy, Lease
from .namespace import RULE, top_name
from .presence import PUBLISHER_FILE
from .slots import IngestSlots, LeaseLost, SlotResult
from .stager import SlotStager, job_entries
from .state import PUBLISHING, Job
from .transient import environment_wait

if TYPE_CHECKING:
    from .service import PublishService, SpoolFile

log = logging.getLogger("rcds.publish")

STORAGE_LOG_INTERVAL = 600.0  # seconds between warnings while publishing waits for a failed storage


class RepositoryWorker(threading.Thread):
    """Publishes queued jobs into one repository, one revision per batch.

    With ``ingest_slots`` above 1 (the default) it dispatches jobs to ingest slots (``slots``), each
    under a lease on the CID's path, and grafts the finished ones in one revision per batch; with 1 it
    ingests a whole batch in one transaction under the writer lock (the design before leases).
    """

    def __init__(self, service: PublishService, name: str, repo: Repository) -> None:
        super().__init__(name=f"pub-{name}", daemon=True)
        self.service = service
        self.repo_name = name
        self.repo = repo
        self.accepting = threading.Event()  # cleared while cleanup owns the repository
        self.accepting.set()
        self.busy = threading.Lock()  # held while publishing a revision
        self._next_resign_check = 0.0
        self._next_share_check = 0.0
        # While the storage fails (a full disk...): consecutive failures, since when (wall clock), no new
        # try before _resume_at (monotonic), last warning logged (monotonic).
        self._storage_failures = 0
        self._storage_since: float | None = None
        self._resume_at = 0.0
        self._storage_logged = 0.0
        # State database writes that failed (the database shares the full disk), replayed in order before
        # anything else: without them a job would stay "publishing" until the next restart.
        self._pending_writes: list[Callable[[], object]] = []
        self._stuck = False
        settings = service.settings
        self.slots = (
            IngestSlots(settings.slots, settings.small_publish_bytes, service._notify)
            if settings.slots > 1
            else None
        )
        self.stager = SlotStager(service, name, repo, self.slots)

    def close_slots(self) -> None:
        """At stop, after the worker: ingests still running give up (``LeasedReader`` sees the service
        stopping), their jobs go back to the queue and their leases are released."""
        if self.slots is None:
            return
        self.slots.close()
        left = self.slots.take_finished(1 << 30)
        while left:
            for r in left:
                self._finish_slot(r)
            if self.service.state is not None:
                with contextlib.suppress(Exception):  # else the next start requeues them
                    self.service.state.reset_to_queued([r.job.id for r in left])
            left = self.slots.take_finished(1 << 30)

    def run(self) -> None:
        svc = self.service
        assert svc.state is not None
        while not svc.stopping.is_set():
            seen = svc.generation
            self._stuck = False  # due jobs that no slot can take now: wait for a wake-up, do not poll
            pause = self._resume_at - time.monotonic()
            if pause > 0:  # the storage failed: the next try waits for the backoff
                svc.stopping.wait(min(pause, 1.0))
                continue
            ingesting = self.slots is not None and self.slots.busy
            if (not self.accepting.is_set() and not ingesting) or self._locked_elsewhere():
                svc.wait_for_work(seen, 1.0)
                continue
            try:
                while self._pending_writes:
                    self._pending_writes[0]()
                    self._pending_writes.pop(0)
                with self.busy:
                    if self.slots is not None:
                        finished = self.slots.take_finished(svc.settings.batch_max_jobs)
                        if finished:
                            self.publish([r.job for r in finished], {r.job.id: r for r in finished})
                            continue
                    if not self.accepting.is_set():  # paused: only the ingests in flight are grafted
                        self._stuck = True
                    elif self._claim_and_publish():
                        continue
            except (
                Exception
            ) as exc:  # never let the worker die; the jobs were requeued or failed by publish()
                wait = environment_wait(exc)
                if wait is not None:
                    self._storage_failed(wait, exc)
                    continue
                log.exception("worker error", extra=fields(repository=self.repo_name))
                time.sleep(1)
                continue
            retry_at = svc.state.next_retry_at()
            timeout = 1.0 if retry_at is None else max(0.05, min(1.0, retry_at - time.time()))
            if self._stuck and (retry_at is None or retry_at <= time.time()):
                timeout = 1.0  # new uploads and finished ingests wake the worker
            svc.wait_for_work(seen, timeout)
        # Stopping: one last go at state writes still owed (else the next start sorts those jobs out).
        with contextlib.suppress(Exception):
            while self._pending_writes:
                self._pending_writes[0]()
                self._pending_writes.pop(0)

    def _claim_and_publish(self) -> bool:
        """Under ``busy``: start ingests in free slots (or, with one slot, publish a claimed batch here),
        or write the last-use records due. Whether to go round again at once."""
        svc = self.service
        assert svc.state is not None
        if time.monotonic() > self._next_resign_check:
            self._next_resign_check = time.monotonic() + 3600
            svc.resign_if_due(self.repo)
        if self.slots is not None:
            self._stuck = not self._dispatch()
        else:
            jobs = svc.state.claim(self.repo_name, svc.settings.batch_max_jobs, svc.settings.batch_max_bytes)
            if jobs:
                self.publish(jobs)
                return True
        if time.monotonic() > self._next_share_check:  # idle: last-use records due?
            self._next_share_check = time.monotonic() + min(60.0, svc.settings.share_seconds / 2)
            self.publish([])
            return True
        return False

    @property
    def storage_waiting(self) -> bool:
        """Whether publishing here waits for the storage to recover (a full disk...)."""
        return self._storage_since is not None

    def _locked_elsewhere(self) -> bool:
        """Another process (``rcds cleanup``, ``rcds repo``) holds the repository: leave the jobs to others."""
        try:
            with self.repo.lock(blocking=False):
                return False
        except RepositoryError:
            return True
        except OSError as exc:  # out of file descriptors for the lock file: try again in a moment
            log.warning(
                "cannot check the repository lock", extra=fields(repository=self.repo_name, error=str(exc))
            )
            return True

    def publish(self, jobs: list[Job], staged: dict[int, SlotResult] | None = None) -> None:
        """One revision: the jobs, plus the last-use (ts/) records that are due. Nothing to do, no revision.

        ``staged``: the jobs' finished ingests (by job id), grafted instead of ingested here; their
        leases are released and their staged trees dropped once the revision is committed or given up.
        """
        try:
            self._publish(jobs, staged or {})
        finally:
            for r in (staged or {}).values():
                self._finish_slot(r)

    def _publish(self, jobs: list[Job], staged: dict[int, SlotResult]) -> None:
        small = bool(staged) and all(
            r.job.size <= self.service.settings.small_publish_bytes for r in staged.values()
        )
        if small and self.slots is not None:
            self.slots.grafting_small += 1
        try:
            self._publish_revision(jobs, staged)
        finally:
            if small and self.slots is not None:
                self.slots.grafting_small -= 1

    def _publish_revision(self, jobs: list[Job], staged: dict[int, SlotResult]) -> None:
        svc = self.service
        state = svc.state
        assert state is not None
        m = svc.metrics
        started = time.monotonic()
        if not staged:  # ingested here (a slot counts its own job while it runs)
            m.publishing.labels(self.repo_name).set(len(jobs))
        done: list[tuple[Job, int, int]] = []  # job, entries, bytes
        settled: set[int] = set()  # jobs already failed (rejected) or found published
        shares: dict[str, float] = {}
        now = svc.clock()
        try:
            # In the try: on a full disk this first write may fail too, and the jobs must go back.
            shares = state.claim_shares(svc.settings.share_seconds)
            with self.repo.transaction() as txn:
                txn.clock = svc.clock
                top = f"/{svc.prefix}"
                if not txn.exists(top):
                    txn.mkdir(top, nested=True)
                graft_started = time.monotonic()
                for job in jobs:
                    outcome = self._add_job(txn, job, staged.get(job.id))
                    if outcome is None:
                        settled.add(job.id)
                    else:
                        done.append((job, *outcome))
                if not done and not shares:
                    return
                shares.update(dict.fromkeys((job.cid for job, _, _ in done), now))
                # A record that would replace another CID's is skipped (logged there); it stays marked
                # shared, so it is tried again only when its time has moved by share_seconds.
                ts_skipped = len(write_records(txn, shares, svc.server_name).skipped)
                result = txn.commit()
                if staged:
                    m.graft_seconds.labels(self.repo_name).observe(time.monotonic() - graft_started)
        except Exception as exc:
            # Nothing of this revision is live (the transaction aborted): every job not settled goes back
            # to the queue. If the storage failed (a full disk...) it waits, keeping its spool file, for
            # as long as that lasts; otherwise it is retried alone, and fails for good after
            # ``publish_attempts`` tries.
            unsettled = [job for job in jobs if job.id not in settled]
            wait = environment_wait(exc)
            if wait is None:
                reason = f"{type(exc).__name__}: {exc}"
                log.exception("publish failed", extra=fields(repository=self.repo_name, jobs=len(jobs)))
                for job in unsettled:
                    self._write_state(functools.partial(self._retry_or_fail, job, reason))
            else:
                self._storage_failed(wait, exc, len(unsettled))
                for job in unsettled:
                    self._write_state(functools.partial(self._wait, job, wait))
            self._write_state(functools.partial(state.unshare, shares))
            return
        finally:
            if not staged:
                m.publishing.labels(self.repo_name).set(0)
        self._storage_works()
        svc.known_revision[self.repo_name] = result.revision
        svc.announce(self.repo_name)  # the manifest is live: tell the replicas first, then the bookkeeping
        seconds = time.monotonic() - started
        cids = [job.cid for job, _, _ in done]
        for job, _, _ in done:  # a crash from here on is fine: recovery finds the CIDs in the live revision
            Path(job.spool).unlink(missing_ok=True)
        # The last-use time first: a status that finds the CID present finds its last use too.
        self._write_state(functools.partial(state.mark_shared, dict.fromkeys(cids, now)))
        svc.presence.add(self.repo_name, cids, result.revision)
        self._write_state(
            functools.partial(
                state.mark_published, [(job.id, n) for job, n, _ in done], self.repo_name, result.revision
            )
        )
        for job, n, nbytes in done:
            m.publish_seconds.labels(self.repo_name).observe(time.time() - job.submitted)
            m.bytes_ingested.labels(self.repo_name).inc(nbytes)
            m.files_ingested.labels(self.repo_name).inc(n)
            log.info(
                "published",
                extra=fields(
                    cid=job.cid, repository=self.repo_name, revision=result.revision, bytes=nbytes,
                    tarball_bytes=job.size, files=n, seconds=round(time.time() - job.submitted, 3),
                    identity=job.identity,
                ),
            )  # fmt: skip
        m.published.labels(self.repo_name).inc(len(done))
        m.ts_skipped.labels(self.repo_name).inc(ts_skipped)
        m.commit_seconds.labels(self.repo_name).observe(seconds)
        m.batch_size.labels(self.repo_name).observe(len(done))
        svc.update_gauges(self.repo_name, result.revision)
        log.info(
            "revision",
            extra=fields(
                repository=self.repo_name, revision=result.revision, cids=len(done), ts_records=len(shares),
                ts_skipped=ts_skipped,
                catalogs=result.catalogs_written, seconds=round(seconds, 3),
            ),
        )  # fmt: skip

    def _add_job(self, txn: Transaction, job: Job, slot: SlotResult | None = None) -> tuple[int, int] | None:
        """Add one CID to the open transaction. None if the job is settled without it: rejected tarball or
        namespace conflict (failed with the reason), the CID itself found published meanwhile, or (with
        ``slot``, its staged ingest) an ingest that failed or lost its lease (retried)."""
        svc = self.service
        assert svc.state is not None
        if slot is not None and slot.staged is None:
            self._settle_failed_ingest(slot)
            return None
        if slot is not None and (svc.leases is None or svc.leases.refresh(slot.lease.token) is None):
            # It stalled past lease_seconds: its path may be someone else's now. Retried as after an error.
            svc.metrics.failures.labels("lease").inc()
            self._write_state(functools.partial(self._retry_or_fail, job, "lease expired before the graft"))
            log.warning(
                "staged ingest refused: lease expired",
                extra=fields(cid=job.cid, repository=self.repo_name, path=slot.lease.path),
            )
            return None
        path = f"/{svc.prefix}/{job.cid}"
        group = cid_group(job.cid)
        group_path = f"/{svc.prefix}/{group}" if group else None
        where = svc.presence.find(job.cid)
        if where is not None:
            # Published meanwhile: this very CID is in a live revision (another repository, or ours).
            svc.state.mark_published([(job.id, None)], where.repository, where.revision or 0)
            Path(job.spool).unlink(missing_ok=True)
            return None
        if self._is_own_root(txn, job.cid):
            # Published meanwhile in this repository, as the open transaction shows: a previous attempt
            # whose commit was live, or a revision by another process that the index has not seen yet.
            svc.state.mark_published(
                [(job.id, None)], self.repo_name, svc.known_revision.get(self.repo_name, 0)
            )
            Path(job.spool).unlink(missing_ok=True)
            return None
        # The other repositories through the index; ours through the open transaction, which is newer.
        conflict = svc.namespace.conflict(job.cid, skip_repository=self.repo_name, queue=False)
        conflict = conflict or self._conflict_here(txn, job.cid)
        if conflict is not None:
            reason = f"conflict: {conflict}"
            svc.state.mark_failed(job.id, reason)
            svc.metrics.failures.labels("conflict").inc()
            Path(job.spool).unlink(missing_ok=True)
            log.warning("publish conflict", extra=fields(cid=job.cid, reason=reason, identity=job.identity))
            return None
        if group_path is None and _is_empty(txn, path):
            txn.remove(path)  # a group directory left without CIDs holds nothing: the name is free
        new_group = group_path is not None and not txn.exists(group_path)
        try:
            if group_path is not None and new_group:
                txn.mkdir(group_path, nested=True)
            if slot is not None and slot.staged is not None:
                txn.graft(slot.staged)
                return slot.staged.entries, slot.staged.stats.bytes_in
            before = txn.content.stats.bytes_in
            with open(job.spool, "rb") as f:
                n = txn.add_tree(path, job_entries(svc, f, job), nested=True)
            return n, txn.content.stats.bytes_in - before
        except (IngestError, TreeError) as exc:
            if group_path is not None and new_group and _is_empty(txn, group_path):
                txn.remove(group_path)  # the group was made for this CID alone
            reason = f"rejected: {exc}"
            svc.state.mark_failed(job.id, reason)
            svc.metrics.failures.labels("rejected").inc()
            Path(job.spool).unlink(missing_ok=True)
            log.warning("publish rejected", extra=fields(cid=job.cid, reason=str(exc), identity=job.identity))
            return None

    # --- ingest slots ----------------------------------------------------------------------------

    def _dispatch(self) -> bool:
        """Start queued jobs in free slots, each under a lease on its path: a big or retried job alone, else
        a run of small ones within the batch budget. Small ones are never left waiting behind big ones
        (``IngestSlots.fits``). A job whose path is leased elsewhere stays queued. Whether any started."""
        svc, slots = self.service, self.slots
        s = svc.settings
        assert svc.state is not None and slots is not None
        waiting = 0
        free_before = slots.free
        candidates = svc.state.queued(limit=s.batch_max_jobs + 64) if slots.free > 0 else []
        batch: list[tuple[Job, Lease]] = []
        total = 0
        for job in candidates:
            if slots.free <= 0:
                break
            alone = job.size > s.small_publish_bytes or bool(job.attempts or job.waits)
            if batch and (alone or len(batch) >= s.batch_max_jobs or total + job.size > s.batch_max_bytes):
                self._start(batch)
                batch, total = [], 0
                if slots.free <= 0:
                    break
            if not slots.fits(job):
                continue
            took = self._take(job)
            if isinstance(took, Busy):
                waiting += 1
                continue
            if took is None:
                continue
            if alone:
                self._start([took])
            else:
                batch.append(took)
                total += job.size
        if batch:
            self._start(batch)
        svc.metrics.lease_waiting.labels(self.repo_name).set(waiting)
        return slots.free < free_before

    def _take(self, job: Job) -> tuple[Job, Lease] | Busy | None:
        """Lease the job's path and claim it: Busy if the path is leased elsewhere, None if the job is
        no longer queued."""
        svc = self.service
        assert svc.state is not None and svc.leases is not None
        got = svc.leases.acquire(
            self.repo_name, f"{svc.prefix}/{job.cid}", f"job {job.id} ({job.cid})", svc.settings.lease_seconds
        )
        if isinstance(got, Busy):
            log.info(
                "lease busy, job stays queued",
                extra=fields(cid=job.cid, repository=self.repo_name, holder=got.holder,
                             path=got.path, time_remaining=round(got.time_remaining, 1)),
            )  # fmt: skip
            return got
        if not svc.state.claim_job(job.id, self.repo_name):  # another repository's worker took it
            svc.leases.release(got.token)
            return None
        return dataclasses.replace(job, state=PUBLISHING, repository=self.repo_name), got

    def _start(self, batch: list[tuple[Job, Lease]]) -> None:
        assert self.slots is not None
        self.service.metrics.publishing.labels(self.repo_name).inc(len(batch))
        self.slots.start(
            [j for j, _ in batch], [lease for _, lease in batch], functools.partial(self.stager.ingest, batch)
        )

    def stage_early(
        self, cid: str, spool: SpoolFile, striplevels: int, identity: str, size: int
    ) -> bool | None:
        """Stage ``spool`` in a free slot as it arrives (``SlotStager.stage_early``), unless the repository
        is not taking work now (cleanup owns it, or its storage fails). True: started; None: the path is
        leased; False: not here now."""
        if not self.accepting.is_set() or self.storage_waiting:
            return False
        return self.stager.stage_early(cid, spool, striplevels, identity, size)

    def _settle_failed_ingest(self, slot: SlotResult) -> None:
        """A slot's ingest that produced nothing: the tarball's fault fails the job, others retry it."""
        svc, job = self.service, slot.job
        assert svc.state is not None
        if slot.rejected is not None:
            reason = f"rejected: {slot.rejected}"
            self._write_state(functools.partial(svc.state.mark_failed, job.id, reason))
            svc.metrics.failures.labels("rejected").inc()
            Path(job.spool).unlink(missing_ok=True)
            log.warning(
                "publish rejected", extra=fields(cid=job.cid, reason=slot.rejected, identity=job.identity)
            )
            return
        exc = slot.error
        assert exc is not None
        wait = environment_wait(exc)
        if wait is not None:
            self._storage_failed(wait, exc, 1)
            self._write_state(functools.partial(self._wait, job, wait))
            return
        if slot.early:  # the queue's path takes it from the durable spool, as if it had never started early
            svc.metrics.early_staging.labels("failed").inc()
            log.warning(
                "early staging failed, the job is queued",
                extra=fields(cid=job.cid, repository=self.repo_name, reason=f"{type(exc).__name__}: {exc}"),
            )
            self._write_state(functools.partial(svc.state.reset_to_queued, [job.id]))
            return
        if isinstance(exc, LeaseLost):
            svc.metrics.failures.labels("lease").inc()
        reason = f"{type(exc).__name__}: {exc}"
        log.warning(
            "ingest failed", extra=fields(cid=job.cid, repository=self.repo_name, reason=reason),
            exc_info=None if isinstance(exc, LeaseLost) else exc,
        )  # fmt: skip
        self._write_state(functools.partial(self._retry_or_fail, job, reason))

    def _finish_slot(self, slot: SlotResult) -> None:
        """After the commit that grafted the staged tree or gave it up: drop it, release the lease."""
        svc = self.service
        svc.metrics.publishing.labels(self.repo_name).dec()
        if slot.staging is not None:
            slot.staging.abort()
        if svc.leases is not None:
            with contextlib.suppress(Exception):  # a failed release leaves a lease that expires anyway
                svc.leases.release(slot.lease.token)

    def _is_own_root(self, txn: Transaction, cid: str) -> bool:
        """Whether this CID itself is published here: its directory holds a ``.publisher`` and its top-level
        name has its kind. Another CID's directory, or a directory inside one, never counts."""
        prefix = self.service.prefix
        name = top_name(cid)
        if not txn.exists(f"/{prefix}/{cid}/{PUBLISHER_FILE}"):
            return False
        return "/" not in cid or not txn.exists(f"/{prefix}/{name}/{PUBLISHER_FILE}")

    def _conflict_here(self, txn: Transaction, cid: str) -> str | None:
        """Why this repository (as the open transaction sees it) has no room for ``cid``, or None.

        Called after ``_is_own_root`` said the CID is not there. An empty group directory is room for a
        one-level CID (``_add_job`` removes it).
        """
        prefix, repo = self.service.prefix, self.repo_name
        name = top_name(cid)
        top = txn.lookup(f"/{prefix}/{name}")
        if top is None:
            return None
        if not top.is_dir:
            return f"/{prefix}/{name} in {repo} is not a directory"
        top_is_leaf = txn.exists(f"/{prefix}/{name}/{PUBLISHER_FILE}")
        if "/" not in cid:
            if _is_empty(txn, f"/{prefix}/{name}"):
                return None
            return f"cid {cid} conflicts with the group {name}/ in {repo}: {RULE}"
        if top_is_leaf:
            return f"cid {cid} conflicts with the one-level cid {name} in {repo}: {RULE}"
        if txn.exists(f"/{prefix}/{cid}"):
            return f"/{prefix}/{cid} in {repo} exists but is not a published cid (no {PUBLISHER_FILE})"
        return None

    def _wait(self, job: Job, reason: str) -> None:
        """Back to the queue to wait for the storage; the spool file stays, no attempt is spent."""
        svc = self.service
        assert svc.state is not None
        svc.state.wait(job.id, reason, svc.backoff(job.waits))
        svc.metrics.failures.labels("waiting").inc()

    def _write_state(self, write: Callable[[], object]) -> None:
        """Do a write to the state database now, or, if it fails (or earlier ones wait), later, in order."""
        if not self._pending_writes:
            try:
                write()
                return
            except Exception as exc:
                wait = environment_wait(exc)
                if wait is not None:
                    self._storage_failed(wait, exc)
                else:
                    log.exception("state update failed, retried", extra=fields(repository=self.repo_name))
        self._pending_writes.append(write)

    def _storage_failed(self, reason: str, exc: BaseException, jobs: int = 0) -> None:
        """The storage failed (full disk, I/O error): back off, and tell the operator, but not every time."""
        svc = self.service
        now = time.monotonic()
        delay = svc.backoff(self._storage_failures)
        self._storage_failures += 1
        self._resume_at = now + delay
        svc.metrics.storage_waiting.labels(self.repo_name).set(1)
        if self._storage_since is None:
            self._storage_since = time.time()
            self._storage_logged = now
            log.warning(
                "publishing waits for the storage; acknowledged uploads are kept and retried",
                extra=fields(repository=self.repo_name, reason=reason, jobs=jobs, retry_in=round(delay, 1)),
                exc_info=exc,
            )
        elif now - self._storage_logged >= STORAGE_LOG_INTERVAL:
            self._storage_logged = now
            log.warning(
                "publishing still waits for the storage",
                extra=fields(
                    repository=self.repo_name, reason=reason, failures=self._storage_failures,
                    waiting_seconds=round(time.time() - self._storage_since),
                ),
            )  # fmt: skip

    def _storage_works(self) -> None:
        """A publish went through: if the storage had failed, it is back; the waiting jobs go now."""
        if self._storage_since is None:
            return
        svc = self.service
        assert svc.state is not None
        log.warning(
            "publishing resumed: the storage works again",
            extra=fields(
                repository=self.repo_name, failures=self._storage_failures,
                waited_seconds=round(time.time() - self._storage_since, 1),
            ),
        )  # fmt: skip
        self._storage_failures, self._storage_since, self._resume_at = 0, None, 0.0
        svc.metrics.storage_waiting.labels(self.repo_name).set(0)
        self._write_state(svc.state.wake_waiting)
        svc._notify()

    def _retry_or_fail(self, job: Job, reason: str) -> None:
        svc = self.service
        assert svc.state is not None
        if job.attempts + 1 >= svc.settings.publish_attempts:
            svc.state.mark_failed(job.id, f"error: {reason}")
            svc.metrics.failures.labels("error").inc()
            Path(job.spool).unlink(missing_ok=True)
        else:
            svc.state.requeue(job.id, reason, svc.settings.retry_delay * 2**job.attempts)
            svc.metrics.failures.labels("retried").inc()


def _is_empty(txn: Transaction, path: str) -> bool:
    return txn.exists(path) and all(d.name == NESTED_MARKER for d in txn.listdir(path))
