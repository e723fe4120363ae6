"""Ingest slots: the publishes of one repository ingested at once, each under a lease on its own path.

A repository's worker (``worker.RepositoryWorker``) is a dispatcher and a committer. It gives each free
slot a queued job whose path it could lease (``leases``), or a run of small ones (up to the batch
budget, ``batch_max_jobs`` and ``batch_max_bytes``, so that a burst still publishes in few revisions), and
the slot builds each CID's subtree in turn as a staged tree (``StagingTransaction``: decompression, hashing, compression, object writes and catalogs,
without the repository's writer lock). The worker then grafts every staged tree finished since its last
commit into one revision (group commit) in one short transaction. Everything that touches the state
database stays in the worker's thread; a slot only ingests.

A slot may also be claimed by a big upload still arriving (``early``, ``try_start``): it stages from the
spool as it is written and its result joins the worker's commits only once the upload is queued.

Fairness: with two slots or more, big tarballs (over ``small_publish_bytes``) never take the last free
slot, so a small publish starts at once however many big ones are queued; big ones start in queue order
whenever a slot is free, so they make progress.

A big ingest also gives way while small publishes are ingested or grafted: it pauses a millisecond at each
read of its tarball, so that the interpreter lock (the slots are threads) goes to the small ones.

Leases: a slot refreshes its lease as it reads the tarball (at most every third of ``lease_seconds``),
so an ingest that makes no progress for ``lease_seconds`` loses it; the worker refreshes it once more
right before the graft and refuses the staged tree if it is lost (the job is retried as after an error).
A slot's lease is released, and its staged tree dropped, after the commit that grafted it or gave it up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

from ..cvmfs.writer import StagedTree, StagingTransaction
from .leases import Lease, Leases
from .state import Job

# A big ingest pauses this long at each read (64 KiB of tarball) while small publishes are in progress:
# the slots are threads of one process, and its Python work (tar headers, catalog rows) would otherwise
# hold the interpreter lock the small ones need.
GIVE_WAY_SECONDS = 0.001
SMALL_ARRIVAL_SECONDS = 0.5  # how long a small upload just queued counts as in progress (until dispatched)


class LeaseLost(Exception):
    """The ingest's lease expired (it made no progress for ``lease_seconds``)."""


class LeasedReader:
    """A tarball being ingested that keeps its lease alive while it is read."""

    def __init__(
        self,
        raw: BinaryIO,
        leases: Leases,
        lease: Lease,
        cancelled: Callable[[], bool] = lambda: False,
        give_way: Callable[[], bool] = lambda: False,
    ) -> None:
        self._raw = raw
        self._cancelled = cancelled
        self._give_way = give_way
        self._leases = leases
        self._token = lease.token
        self._every = lease.ttl / 3
        self._next = time.monotonic() + self._every

    def keep(self) -> None:
        """Refresh the lease if a third of its time went by; raise ``LeaseLost`` if it is gone."""
        if self._cancelled():
            raise LeaseLost("the service is stopping")
        if time.monotonic() < self._next:
            return
        if self._leases.refresh(self._token) is None:
            raise LeaseLost("the lease expired during the ingest")
        self._next = time.monotonic() + self._every

    def read(self, n: int = -1) -> bytes:
        self.keep()
        if self._give_way():
            time.sleep(GIVE_WAY_SECONDS)
        return self._raw.read(n)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        self.keep()
        if self._give_way():
            time.sleep(GIVE_WAY_SECONDS)
        return self._raw.readinto(buffer)  # type: ignore[attr-defined,no-any-return]


@dataclass
class SlotResult:
    """A finished ingest: a staged tree to graft, or why there is none."""

    job: Job
    lease: Lease
    staged: StagedTree | None = None
    staging: StagingTransaction | None = None
    rejected: str | None = None  # the tarball's fault (IngestError, TreeError): the job fails
    error: BaseException | None = None  # anything else (a full disk, a lost lease...): retried
    seconds: float = 0.0
    early: bool = False  # staged as it arrived (``early``): an error sends it back to the queue


@dataclass
class _Running:
    jobs: list[Job]
    leases: list[Lease]
    future: Future[list[SlotResult]]


@dataclass
class IngestSlots:
    """``size`` ingests at once on a thread pool; finished results wait for the worker's next commit."""

    size: int
    small_bytes: int
    on_done: Callable[[], None]  # wakes the worker
    running: list[_Running] = field(default_factory=list)
    grafting_small: int = 0  # set by the worker while it grafts small publishes
    small_arrived: float = 0.0  # monotonic time of the last small upload queued (it waits for dispatch)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: ThreadPoolExecutor | None = None

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(self.size, thread_name_prefix="ingest")

    @property
    def free(self) -> int:
        with self._lock:
            return self.size - len(self.running)

    @property
    def busy(self) -> bool:
        """Ingests running or finished and not yet taken by the worker."""
        with self._lock:
            return bool(self.running)

    def small_in_progress(self) -> bool:
        """Small publishes queued a moment ago, being ingested or grafted: big ingests give way
        (``LeasedReader``)."""
        if self.grafting_small or time.monotonic() - self.small_arrived < SMALL_ARRIVAL_SECONDS:
            return True
        with self._lock:
            return any(all(j.size <= self.small_bytes for j in r.jobs) for r in self.running)

    def fits(self, job: Job) -> bool:
        """Whether ``job`` may take a free slot now (the last one is kept for small publishes)."""
        with self._lock:
            return self._fits(job)

    def _fits(self, job: Job) -> bool:  # with the lock held
        free = self.size - len(self.running)
        if free <= 0:
            return False
        if self.size < 2 or job.size <= self.small_bytes:
            return True
        return free > 1

    def start(self, jobs: list[Job], leases: list[Lease], ingest: Callable[[], list[SlotResult]]) -> None:
        """Run ``ingest`` (the jobs' ingests, one after the other) in a free slot."""
        with self._lock:
            future = self._submit(jobs, leases, ingest)
        future.add_done_callback(lambda _: self.on_done())

    def try_start(self, job: Job, lease: Lease, ingest: Callable[[], list[SlotResult]]) -> bool:
        """``start`` one job if it ``fits`` now, checked and taken at once (an upload staged as it arrives
        claims its slot from the web server's threads, beside the worker's dispatch)."""
        with self._lock:
            if not self._fits(job):
                return False
            future = self._submit([job], [lease], ingest)
        future.add_done_callback(lambda _: self.on_done())
        return True

    def _submit(
        self, jobs: list[Job], leases: list[Lease], ingest: Callable[[], list[SlotResult]]
    ) -> Future[list[SlotResult]]:  # with the lock held
        assert self._pool is not None
        future = self._pool.submit(ingest)
        self.running.append(_Running(jobs, leases, future))
        return future

    def take_finished(self, max_jobs: int) -> list[SlotResult]:
        """Finished ingests for one commit (at least one slot's, up to ``max_jobs``), in starting order.
        A retried job was started alone, and is grafted alone: it cannot sink a batch twice."""
        with self._lock:
            taken: list[_Running] = []
            count = 0
            for r in self.running:
                if not r.future.done():
                    continue
                retried = any(j.attempts or j.waits for j in r.jobs)
                if taken and (count + len(r.jobs) > max_jobs or retried):
                    break
                taken.append(r)
                count += len(r.jobs)
                if retried:
                    break
            for r in taken:
                self.running.remove(r)
        return [result for r in taken for result in r.future.result()]

    def paths(self) -> list[str]:
        with self._lock:
            return [lease.path for r in self.running for lease in r.leases]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
