"""Batches of small whole files stored by worker processes, for a store in a local directory.

A small file costs the ingest more in per-file work than in deflating: open, read and close the source;
hash it for the content index; create, write, close and rename the object. Each of those system calls
releases and retakes the GIL, so ingest threads hand it back and forth about ten times a file, and two
threads did the work of 1.5 cores (20,000 small files: 5.9 CPU s in 3.8 s on two cores, against 4.8 CPU s
on one thread). Worker processes have a GIL each. They read, look up, deflate and store a batch, and send
back only names; the transaction's process records them.

Only a ``LocalStore`` is written this way (its objects are files any process of the machine may put in
place, atomically, by the same rename); other stores keep the ingest threads. The workers are shared by
every transaction of the process, started on first use and kept.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import pickle
import queue
import select
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from ..logs import fields
from ..storage.local import LocalStore
from .contentindex import ContentIndex
from .hashes import ContentHash, Suffix
from .objects import compress

log = logging.getLogger("rcds.ingest")

# What a worker reports of one file: (index key or None, object digest, compressed bytes written), with
# -1 for bytes written when the index knew the content and the object is there (nothing was written).
FileOutcome = tuple[bytes | None, bytes, int]
FROM_INDEX = -1

_WHOLE_SUFFIX = Suffix.NONE.value.encode()

START_SECONDS = 30.0  # for a worker to import and say it is ready (about 0.1 s on an idle machine)
RETRY_START_SECONDS = 300.0  # after a worker could not be started, no other is tried until then

READY = b"R"
"""What a worker writes first, once it runs: a program that is not one (an interpreter that cannot
import rcds, a frozen executable that does not take ``-c``) never does."""


# --- in a worker process -----------------------------------------------------------------------------

_stores: dict[str, LocalStore] = {}
_indexes: dict[str, ContentIndex | None] = {}


def _store(root: str) -> LocalStore:
    store = _stores.get(root)
    if store is None:
        store = _stores[root] = LocalStore(Path(root))
        store.early_sync_bytes = sys.maxsize  # the transaction's process counts what its workers write
    return store


def _index_hits(index_path: str | None, keys: list[bytes]) -> dict[bytes, bytes]:
    """The index's entries for ``keys``: only read here; the transaction records entries, at commit."""
    if index_path is None or not keys:
        return {}
    if index_path not in _indexes:
        if len(_indexes) >= 16:  # the repositories of one server are few; a test run's are many
            for index in _indexes.values():
                if index is not None:
                    index.close()
            _indexes.clear()
        try:
            _indexes[index_path] = ContentIndex(Path(index_path))
        except sqlite3.Error:
            _indexes[index_path] = None
    index = _indexes[index_path]
    return index.get_many(keys) if index is not None else {}


def read_file(path: str, size: int, offset: int = 0) -> bytes:
    """``size`` bytes of the file at ``path`` from ``offset`` (EOFError if it is shorter)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, size, offset)
        if len(data) < size:
            parts = [data]
            got = len(data)
            while got < size:
                block = os.pread(fd, size - got, offset + got)
                if not block:
                    raise EOFError(f"{path}: ended {size - got} bytes early")
                parts.append(block)
                got += len(block)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


def read_batch(
    items: list[tuple[str | bytes, int]], keyed: bool
) -> tuple[list[bytes | BaseException], list[bytes | None]]:
    """The contents of whole files (a path to read, or the bytes), an exception for one that cannot be
    read; and, if ``keyed``, their content index keys (None for those exceptions)."""
    datas: list[bytes | BaseException] = []
    for item, size in items:
        try:
            datas.append(item if isinstance(item, bytes) else read_file(item, size))
        except (OSError, EOFError) as exc:
            datas.append(exc)
    keys = [
        hashlib.sha256(d).digest() + _WHOLE_SUFFIX if keyed and not isinstance(d, BaseException) else None
        for d in datas
    ]
    return datas, keys


def store_batch(
    root: str, index_path: str | None, items: list[tuple[str | bytes, int]]
) -> list[FileOutcome | BaseException]:
    """Store whole files (a path to read, or the bytes) as objects under ``root``; one outcome per item,
    an exception for a file that could not be read or stored (the others go on)."""
    store = _store(root)
    datas, keys = read_batch(items, keyed=index_path is not None)
    known = _index_hits(index_path, [k for k in keys if k is not None])
    written: set[bytes] = set()
    out: list[FileOutcome | BaseException] = []
    for data, key in zip(datas, keys, strict=True):
        if isinstance(data, BaseException):
            out.append(data)
            continue
        hit = known.get(key) if key is not None else None
        if hit is not None and store.exists(ContentHash(hit[:20]).object_name(Suffix.NONE)):
            out.append((key, hit[:20], FROM_INDEX))
            continue
        try:
            stored, h = compress(data)
            if h.digest not in written:  # the same content twice in a batch: one object
                store.put(h.object_name(Suffix.NONE), stored)
                written.add(h.digest)
            out.append((key, h.digest, len(stored)))
        except OSError as exc:
            out.append(exc)
    return out


def worker_main() -> None:
    """A worker's loop: a pickled ``(root, index_path, items)`` in on stdin, its outcomes out, until end of
    input (the transaction's process is gone). Anything else that writes to stdout goes to stderr."""
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    replies.write(READY)  # imported and listening: the pool may send it batches
    replies.flush()
    while True:
        try:
            root, index_path, items = pickle.load(requests)
        except (EOFError, pickle.UnpicklingError):  # the transaction's process ended (mid-request)
            return
        pickle.dump(store_batch(root, index_path, items), replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()


# --- in the transaction's process ----------------------------------------------------------------------

# The worker runs this: our own small start-up instead of multiprocessing's, which would import the
# caller's ``__main__`` again in every worker (a script without a main guard would run twice). It gets
# the caller's sys.path, so it imports this very rcds.
_WORKER_MAIN = (
    "import sys; sys.path[:0] = sys.argv[1:]; from rcds.cvmfs.smallfiles import worker_main; worker_main()"
)


class WorkerGone(RuntimeError):
    """A worker process ended while it held a batch (killed, out of memory)."""


_Request = tuple[str, str | None, list[tuple[str | bytes, int]]]
_Job = tuple[_Request, Future[list[FileOutcome | BaseException]]]


class _Worker:
    """One worker process and the thread that hands it batches from the pool's queue, one at a time."""

    def __init__(self, jobs: queue.SimpleQueue[_Job | None], lost: Callable[[_Worker], None]) -> None:
        self.jobs = jobs
        self._lost = lost
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_MAIN, *sys.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )

    def wait_ready(self, deadline: float) -> None:
        """Take batches once the process says it runs; if it has not by ``deadline`` (monotonic), it is
        killed and this raises OSError."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready or self.proc.stdout.read(len(READY)) != READY:
            # Every worker started the same way would fail too: the caller stores in threads instead of
            # failing each transaction on a worker that is gone (or waiting for one that never answers).
            with contextlib.suppress(OSError):
                self.proc.kill()
            status = self.proc.wait()
            raise OSError(
                f"{sys.executable} did not start a small-file worker within {START_SECONDS:g} s "
                f"(exit status {status})"
            )
        threading.Thread(target=self._run, name="rcds-smallfiles", daemon=True).start()

    def _run(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        while (job := self.jobs.get()) is not None:
            request, future = job
            if not future.running() and not future.set_running_or_notify_cancel():
                continue  # cancelled (a requeued batch is running already)
            try:
                pickle.dump(request, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self.proc.stdin.flush()
            except (OSError, ValueError):  # it ended while idle: the batch goes to another worker
                self.jobs.put((request, future))
                self._end()
                return
            try:
                outcomes = pickle.load(self.proc.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as exc:  # it ended on this batch
                future.set_exception(WorkerGone(f"small-file worker {self.proc.pid} ended: {exc!r}"))
                self._end()
                return
            future.set_result(outcomes)
        self.proc.stdin.close()
        self.proc.wait()

    def _end(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        self._lost(self)


class WorkerPool:
    """Worker processes taking batches from one queue; started on the first batch (or ahead of it, by
    ``start_soon``), replaced when one ends, stopped at exit. If one cannot be started (no process, or a
    program that does not answer as a worker), none is tried for ``RETRY_START_SECONDS``; with none
    running, callers store in threads."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._workers: list[_Worker] = []
        self._starting: list[_Worker] = []  # spawned by start_soon, not yet known to be ready
        self._no_start_before = 0.0  # (monotonic) after a worker could not be started

    def start_soon(self) -> None:
        """Spawn the missing workers without waiting for them: they import while the caller goes on
        (a transaction that will hand them batches shortly), and the first batch waits only for what is
        left of their start-up (about 0.1-0.2 s of a fresh process's first ingest)."""
        with self._lock:
            if time.monotonic() < self._no_start_before:
                return
            with contextlib.suppress(OSError):  # the first batch tries again, and says why it failed
                while len(self._workers) + len(self._starting) < self.size:
                    self._starting.append(_Worker(self._jobs, self._lost))

    def submit(self, request: _Request) -> Future[list[FileOutcome | BaseException]] | None:
        """The outcomes of ``store_batch(*request)`` in a worker; None if no worker can be started (where
        processes cannot be made: the caller stores the batch itself)."""
        with self._lock:
            if not self._start_missing():
                return None
            future: Future[list[FileOutcome | BaseException]] = Future()
            self._jobs.put((request, future))
            return future

    def pids(self) -> list[int]:
        """The process ids of the workers, running or starting (for measuring them; a test kills one)."""
        with self._lock:
            return [w.proc.pid for w in [*self._workers, *self._starting]]

    def stop(self) -> None:
        """End of input to every worker once it has done what it was given, and wait for them; the next
        batch starts new ones."""
        with self._lock:
            workers, jobs, starting = self._workers, self._jobs, self._starting
            self._workers, self._jobs, self._starting = [], queue.SimpleQueue(), []
        for _ in workers:
            jobs.put(None)
        for worker in starting:  # never given a batch: end of input ends them
            assert worker.proc.stdin is not None
            with contextlib.suppress(OSError):
                worker.proc.stdin.close()
        for worker in [*workers, *starting]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=5)

    def _start_missing(self) -> bool:
        """(Under the lock.) Start the workers the pool lacks; False if it has none and can start none."""
        if len(self._workers) >= self.size or time.monotonic() < self._no_start_before:
            return bool(self._workers)
        started, self._starting = self._starting, []
        error: OSError | None = None
        try:
            while len(self._workers) + len(started) < self.size:
                started.append(_Worker(self._jobs, self._lost))
        except OSError as exc:
            error = exc
        deadline = time.monotonic() + START_SECONDS
        for worker in started:  # they start side by side: one start-up's wait, not one per worker
            try:
                worker.wait_ready(deadline)
            except OSError as exc:
                error = exc
                continue
            self._workers.append(worker)
            log.info(
                "small-file worker started", extra=fields(pid=worker.proc.pid, workers=len(self._workers))
            )
        if error is not None:
            self._no_start_before = time.monotonic() + RETRY_START_SECONDS
            log.warning(
                "could not start a small-file worker process",
                extra=fields(error=str(error), workers=len(self._workers), retry_seconds=RETRY_START_SECONDS),
            )
        return bool(self._workers)

    def _lost(self, worker: _Worker) -> None:
        """A worker ended: it, and any other whose process has ended too (killed with it), leave the pool
        and new ones start in their place; if none can run, fail the batches still queued (else they would
        wait for ever)."""
        log.warning(
            "small-file worker ended", extra=fields(pid=worker.proc.pid, status=worker.proc.returncode)
        )
        with self._lock:
            if worker not in self._workers:
                return  # of a stopped pool
            self._workers.remove(worker)
            # An idle worker would show its end only on its next batch, holding a place meanwhile (its
            # thread, still waiting for a batch, requeues the one it takes and leaves).
            self._workers = [w for w in self._workers if w.proc.poll() is None]
            if self._start_missing():
                return
            jobs = self._jobs
        while True:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None and job[1].set_running_or_notify_cancel():
                job[1].set_exception(WorkerGone("no small-file worker process could be started"))


POOL = WorkerPool(os.cpu_count() or 2)
"""The process's workers, shared by all its transactions."""
atexit.register(POOL.stop)
