"""Early staging: a big upload's ingest runs while its body arrives (issue 19, the service path).

Without it a big tarball (uploaded, or fetched by the server for ``source=``) is spooled, fsynced and
queued, and only then ingested: the upload and the ingest take turns. With it, as soon as an upload is
known to be big (``PublishService.start_early``), a worker claims one of its ingest slots and the lease
on the CID's path, as its dispatcher does for a queued job, and the slot stages the tarball from a
``FollowingReader`` over the spool's ``.part`` file: it gets the bytes as they are written and waits for
more until the upload is complete (then end of file) or discarded (then ``SpoolDiscarded``, which stops
the staging).

The staged tree is never grafted on its own. The slot waits at an ``EarlyStaging`` gate until ``accept``
has fsynced the spool and durably enqueued the job, claimed for the slot's repository in the same
transaction; only then is the result handed to the worker's normal group commit (no second ingest). So
``OK`` still means fsynced and queued, and nothing is in a revision before that.

Falling back is always to today's path: no free slot or the lease busy (nothing starts early), an upload
aborted or refused at ``accept`` (the gate is abandoned: the staging is dropped, the lease released, the
slot freed), a staging that failed for a reason not the tarball's (the durable job goes back to the queue
without spending an attempt and is ingested from the spool as before), a restart (the job is requeued as
any interrupted one). A tarball rejected mid-stream is the job's rejection, exactly as in the queue.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .leases import Lease
from .state import Job

WAIT_SECONDS = 0.5  # how often a waiting reader or gate looks at its cancel condition


class SpoolDiscarded(Exception):
    """The upload being followed was aborted (client gone, too large, refused): stop its staging."""


class UploadTooSlow(Exception):
    """The staging has waited for the uploader longer than it may hold its slot: it gives the slot back,
    and the upload, which goes on, is ingested from the spool once complete."""


class SpoolProgress:
    """How much of a spool file is written, shared by its writer and a ``FollowingReader``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.written = 0
        self.complete = False
        self.discarded = False

    def wrote(self, n: int) -> None:
        with self._cond:
            self.written += n
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self.complete = True
            self._cond.notify_all()

    def discard(self) -> None:
        with self._cond:
            self.discarded = True
            self._cond.notify_all()

    def wait_beyond(self, offset: int, cancelled: Callable[[], bool], keep: Callable[[], None]) -> int:
        """Bytes written past ``offset``, once there are any; 0 at the end of a complete upload. ``keep``
        is called while it waits (it keeps the staging's lease alive, and may raise to stop it)."""
        with self._cond:
            while True:
                if self.discarded:
                    raise SpoolDiscarded("the upload was aborted")
                if self.written > offset or self.complete:
                    return self.written - offset
                if cancelled():
                    raise SpoolDiscarded("the service is stopping")
                if not self._cond.wait(WAIT_SECONDS):
                    keep()


class FollowingReader:
    """A spool file read while it is written: ``read(n)`` returns ``n`` bytes, blocking for them, or fewer
    only at the end of the complete upload, as a finished file would."""

    def __init__(
        self,
        path: Path,
        progress: SpoolProgress,
        cancelled: Callable[[], bool],
        max_wait: float | None = None,
    ) -> None:
        self._fd = os.open(path, os.O_RDONLY)  # still readable after the rename to .tar
        self._progress = progress
        self._cancelled = cancelled
        self._offset = 0
        self.max_wait = max_wait  # seconds of waiting for the writer, in all, before UploadTooSlow
        self.waited = 0.0
        self._wait_started = 0.0
        self.keep: Callable[[], None] = lambda: None  # called while waiting for the writer

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        wanted = n if n >= 0 else 1 << 62
        while wanted > 0:
            self._wait_started = time.monotonic()
            available = self._progress.wait_beyond(self._offset, self._cancelled, self._keep)
            self.waited += time.monotonic() - self._wait_started
            self._check_waited(0.0)
            if available == 0:
                break
            data = os.pread(self._fd, min(wanted, available, 1 << 24), self._offset)
            if not data:  # the writer counts only what it wrote: this cannot happen but must not spin
                raise OSError(f"spool file shorter than written ({self._offset} bytes)")
            parts.append(data)
            self._offset += len(data)
            wanted -= len(data)
        return b"".join(parts)

    def _keep(self) -> None:
        """While waiting: stop once the uploader has been waited for too long, else keep the lease."""
        self._check_waited(time.monotonic() - self._wait_started)
        self.keep()

    def _check_waited(self, waiting: float) -> None:
        if self.max_wait is not None and self.waited + waiting > self.max_wait:
            raise UploadTooSlow(f"the upload kept its staging waiting for over {self.max_wait:g} s")

    def readinto(self, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FollowingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_RUNNING, _HANDING_OVER, _HANDED, _ABANDONED = "running", "handing over", "handed", "abandoned"


class EarlyStaging:
    """The gate between an upload staged early (in a slot of ``repository`` under ``lease``) and ``accept``.

    ``accept`` calls ``begin_hand_over`` before its enqueue (True: enqueue the job claimed for
    ``repository``), then ``hand_over(job)`` or ``abandon()``; an aborted upload calls ``abandon``. The
    slot calls ``outcome`` once its staging is over: the durable job, or None (drop everything).
    """

    def __init__(self, cid: str, repository: str, lease: Lease, provisional: Job) -> None:
        self.cid = cid
        self.repository = repository
        self.lease = lease
        self.provisional = provisional  # the slot's job until the real one exists (id 0, never in the DB)
        self._cond = threading.Condition()
        self._state = _RUNNING
        self._job: Job | None = None
        self.started = time.monotonic()
        self.handed_at: float | None = None  # monotonic time of the hand-over (the upload's enqueue)

    def begin_hand_over(self) -> bool:
        with self._cond:
            if self._state != _RUNNING:
                return False
            self._state = _HANDING_OVER
            return True

    def hand_over(self, job: Job) -> None:
        with self._cond:
            assert self._state == _HANDING_OVER
            self._job, self._state = job, _HANDED
            self.handed_at = time.monotonic()
            self._cond.notify_all()

    def abandon(self) -> None:
        """The upload will not be queued with this staging (aborted, refused, or queued without it)."""
        with self._cond:
            if self._state in (_RUNNING, _HANDING_OVER):
                self._state = _ABANDONED
                self._cond.notify_all()

    @property
    def abandoned(self) -> bool:
        with self._cond:
            return self._state == _ABANDONED

    def outcome(self, cancelled: Callable[[], bool]) -> Job | None:
        """In the slot, after the staging: wait for ``accept``'s decision. A service stopping abandons an
        upload not yet being queued; one being queued is waited for (a single short transaction)."""
        with self._cond:
            while self._state in (_RUNNING, _HANDING_OVER):
                if self._state == _RUNNING and cancelled():
                    self._state = _ABANDONED
                    break
                self._cond.wait(WAIT_SECONDS)
            return self._job if self._state == _HANDED else None


__all__ = ["EarlyStaging", "FollowingReader", "SpoolDiscarded", "SpoolProgress", "UploadTooSlow"]
