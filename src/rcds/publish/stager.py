"""What runs in a repository's ingest slots: a queued job's tarball, or a big upload as it arrives
(``early``), staged under the lease on its CID's path into a ``StagingTransaction``. The results
(``SlotResult``) go back to the repository's worker (``rcds.publish.worker``), which grafts them in its
next group commit.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO, cast

from ..cvmfs.errors import TreeError
from ..cvmfs.repository import Repository
from ..cvmfs.tree import EntryKind, TreeEntry
from ..cvmfs.writer import StagedTree, StagingTransaction
from ..ingest.tarstream import IngestError, tar_entries
from ..logs import fields
from .early import EarlyStaging, FollowingReader, UploadTooSlow
from .leases import Busy, Lease
from .presence import PUBLISHER_FILE
from .slots import IngestSlots, LeasedReader, LeaseLost, SlotResult
from .state import PUBLISHING, Job

if TYPE_CHECKING:
    from .service import PublishService, SpoolFile

log = logging.getLogger("rcds.publish")

# Compression workers of a big tarball's staging: all the cores, as the core's own ingest. Small publishes
# beside it are not starved: the big one's reader gives way to them (``LeasedReader``), and its workers
# have nothing to compress while it does. Measured in bench/README.md ("Service against core"): on two
# cores, all of them beat all but one by 15-25 % of the service's time.
_BIG_STAGING_WORKERS = os.cpu_count() or 1


class SlotStager:
    """Stages tarballs in the ingest slots of one repository. Touches no job state: what happened is in
    each ``SlotResult``, for the worker to settle."""

    def __init__(
        self, service: PublishService, repo_name: str, repo: Repository, slots: IngestSlots | None
    ) -> None:
        self.service = service
        self.repo_name = repo_name
        self.repo = repo
        self.slots = slots

    def ingest(self, batch: list[tuple[Job, Lease]]) -> list[SlotResult]:
        """In a slot's thread: build the jobs' staged trees, one after the other, in one staging (sealed at
        the end). Never raises; touches no state."""
        svc = self.service
        assert svc.leases is not None
        results: list[SlotResult] = []
        staging: StagingTransaction | None = None
        big_run = any(job.size > svc.settings.small_publish_bytes for job, _ in batch)
        for job, lease in batch:
            started = time.monotonic()
            result = SlotResult(job, lease)
            results.append(result)
            try:
                if svc.leases.refresh(lease.token) is None:  # it waited for the jobs before it in its slot
                    raise LeaseLost("the lease expired before the ingest started")
                if staging is None:
                    staging = self._new_staging(big_run)
                with open(job.spool, "rb") as raw:
                    result.staged = self._stage(staging, self._leased_reader(raw, lease, big_run), job)
                result.staging = staging
            except (IngestError, TreeError) as exc:
                result.rejected = str(exc)  # raised before any catalog changed: the staging goes on
            except Exception as exc:
                result.error = exc
                if staging is not None:  # it may be half-changed: the next job gets a new one
                    self.drop_staging(staging, results)
                    staging = None
            result.seconds = time.monotonic() - started
        if staging is not None:
            try:
                staging.seal()
            except Exception as exc:
                self.drop_staging(staging, results, exc)
        for r in results:
            self._log_staged(r)
        return results

    def _new_staging(self, big: bool) -> StagingTransaction:
        """A staging for slot ingests: a big tarball's compresses on every core."""
        staging = self.repo.staging(workers=_BIG_STAGING_WORKERS if big else None)
        staging.clock = self.service.clock
        return staging

    def _leased_reader(self, raw: BinaryIO, lease: Lease, big: bool) -> LeasedReader:
        """``raw`` read under ``lease`` (kept alive, lost: stop); a big tarball gives way to small publishes."""
        svc = self.service
        assert svc.leases is not None
        give_way = self.slots.small_in_progress if big and self.slots is not None else (lambda: False)
        return LeasedReader(raw, svc.leases, lease, svc.stopping.is_set, give_way)

    def _stage(self, staging: StagingTransaction, reader: LeasedReader, job: Job) -> StagedTree:
        """The job's tarball, read from ``reader``, staged at its CID's path (with its publisher file)."""
        svc = self.service
        return staging.stage(f"/{svc.prefix}/{job.cid}", job_entries(svc, cast(BinaryIO, reader), job))

    def _log_staged(self, result: SlotResult, **extra: object) -> None:
        if result.staged is not None:
            log.info(
                "staged", extra=fields(cid=result.job.cid, repository=self.repo_name,
                                       files=result.staged.entries, bytes=result.staged.stats.bytes_in,
                                       seconds=round(result.seconds, 3), **extra),
            )  # fmt: skip

    def stage_early(
        self, cid: str, spool: SpoolFile, striplevels: int, identity: str, size: int
    ) -> bool | None:
        """Claim a free slot and the lease on the CID's path, and stage ``spool`` there as it arrives
        (``early``). True: started; None: the path is leased; False: no slot here now."""
        svc, slots = self.service, self.slots
        if slots is None or svc.leases is None:
            return False
        now = time.time()
        provisional = Job(0, cid, PUBLISHING, str(spool.part), size, striplevels, identity, now, now, None,
                          self.repo_name, None, None, 0, None)  # fmt: skip
        if not slots.fits(provisional):  # the commit's writer lock is not needed: a staging runs beside it
            return False
        reader = FollowingReader(spool.part, spool.progress, svc.stopping.is_set,
                                 svc.settings.early_staging_max_wait)  # opened while it exists  # fmt: skip
        try:
            got = svc.leases.acquire(
                self.repo_name, f"{svc.prefix}/{cid}", f"upload of {cid} (staged as it arrives)",
                svc.settings.lease_seconds,
            )  # fmt: skip
        except BaseException:
            reader.close()
            raise
        if isinstance(got, Busy):
            reader.close()
            return None
        early = EarlyStaging(cid, self.repo_name, got, provisional)
        spool.early = early
        svc.metrics.publishing.labels(self.repo_name).inc()
        if not slots.try_start(provisional, got, functools.partial(self._ingest_early, early, reader)):
            svc.metrics.publishing.labels(self.repo_name).dec()
            spool.early = None
            reader.close()
            with contextlib.suppress(Exception):
                svc.leases.release(got.token)
            return False
        log.info(
            "staging an upload as it arrives",
            extra=fields(cid=cid, repository=self.repo_name, expected_bytes=size),
        )
        return True

    def _ingest_early(self, early: EarlyStaging, raw: FollowingReader) -> list[SlotResult]:
        """In a slot's thread: stage an upload as it arrives, then wait for ``accept`` (``early``). The
        result goes to the normal commit only once the job is durably queued; otherwise it is dropped here.
        Never raises; touches no state."""
        svc = self.service
        assert svc.leases is not None
        job = early.provisional
        result = SlotResult(job, early.lease, early=True)
        staging: StagingTransaction | None = None
        try:
            staging = self._new_staging(big=True)
            reader = self._leased_reader(cast(BinaryIO, raw), early.lease, big=True)
            raw.keep = reader.keep  # a client pausing does not cost the lease while it is within its limits
            result.staged = self._stage(staging, reader, job)
            staging.seal()
            result.staging = staging
        except (IngestError, TreeError) as exc:
            result.rejected = str(exc)
        except UploadTooSlow as exc:  # the slot goes back now; accept queues the upload as any other
            result.error = exc
            early.abandon()
        except Exception as exc:  # the upload aborted, the service stopping, a full disk...
            result.error = exc
        finally:
            raw.close()
        if result.staging is None and staging is not None:
            result.staged = None
            with contextlib.suppress(Exception):
                staging.abort()
        result.seconds = time.monotonic() - early.started
        durable = early.outcome(svc.stopping.is_set)
        svc.early_over(job.cid)  # handed over (the queue has the CID now) or dropped
        if durable is None:  # aborted, refused or queued without it: as if it had never started
            with contextlib.suppress(Exception):
                if result.staging is not None:
                    result.staging.abort()
            with contextlib.suppress(Exception):
                svc.leases.release(early.lease.token)
            svc.metrics.publishing.labels(self.repo_name).dec()
            svc.metrics.early_staging.labels(
                "too_slow" if isinstance(result.error, UploadTooSlow) else "abandoned"
            ).inc()
            log.info(
                "early staging dropped",
                extra=fields(cid=job.cid, repository=self.repo_name,
                             reason=str(result.error or result.rejected or "the upload was not queued")),
            )  # fmt: skip
            return []
        result.job = durable
        if early.handed_at is not None:
            svc.metrics.early_overlap_seconds.observe(early.handed_at - early.started)
        if result.staged is not None:
            svc.metrics.early_staging.labels("staged").inc()
        self._log_staged(result, early=True)
        return [result]

    @staticmethod
    def drop_staging(
        staging: StagingTransaction, results: list[SlotResult], error: BaseException | None = None
    ) -> None:
        """Give up a staging and the trees staged in it (their jobs are retried)."""
        staging.abort()
        for r in results:
            if r.staging is staging:
                r.staging, r.staged = None, None
                r.error = r.error or error or RuntimeError("its staging failed with a later tarball")


def job_entries(service: PublishService, tarball: BinaryIO, job: Job) -> Iterator[TreeEntry]:
    """The tree a job publishes: its tarball's entries (under the service's limits, its striplevels) and
    ``.publisher``."""
    entries = tar_entries(tarball, service.settings.limits, job.striplevels)
    return _with_publisher(entries, job.identity, int(service.clock()))


def _with_publisher(entries: Iterator[TreeEntry], identity: str, now: int) -> Iterator[TreeEntry]:
    """The tarball's entries plus ``.publisher`` (who published it), replacing any the tarball brought."""
    for e in entries:
        if e.path.strip("/") == PUBLISHER_FILE:
            if e.stream is not None:  # consume it: the stream must be read before the next member
                _drain(e.stream, e.size)
            continue
        yield e
    data = (identity + "\n").encode("utf-8", "replace")
    yield TreeEntry(
        PUBLISHER_FILE, EntryKind.FILE, mode=0o644, mtime=now, size=len(data), stream=io.BytesIO(data)
    )


def _drain(stream: BinaryIO, size: int) -> None:
    left = size
    while left > 0:
        block = stream.read(min(left, 1 << 20))
        if not block:
            break
        left -= len(block)
