"""The durable state of the service: the publish queue and the CIDs' last-use times, in one SQLite file.

An upload is acknowledged (``OK``) only after its spool file is fsynced and its job row is committed with
``synchronous=FULL``, so an acknowledged upload survives a crash or a power cut. The queue is the ``jobs``
table; a partial unique index allows at most one *active* (queued or publishing) job per CID, which is what
makes two concurrent uploads of one CID publish it once.

Job states: ``queued`` -> ``publishing`` -> ``published`` | ``failed`` (or back to ``queued`` for a retry).
A job back in the queue counts either an ``attempt`` (an error that may be anyone's: bounded by
``publish_attempts``) or a ``wait`` (the storage failed, e.g. a full disk: retried until it recovers).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..cvmfs import failpoints
from .sqlitefile import SqliteFile

QUEUED: Final = "queued"
PUBLISHING: Final = "publishing"
PUBLISHED: Final = "published"
FAILED: Final = "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    cid TEXT NOT NULL,
    state TEXT NOT NULL,
    spool TEXT NOT NULL,
    size INTEGER NOT NULL,
    striplevels INTEGER NOT NULL DEFAULT 0,
    identity TEXT NOT NULL,
    submitted REAL NOT NULL,
    started REAL,
    finished REAL,
    repository TEXT,
    revision INTEGER,
    files INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    reason TEXT,
    waits INTEGER NOT NULL DEFAULT 0  -- failures of the storage (full disk...) since the last other outcome
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_active_cid ON jobs(cid) WHERE state IN ('queued', 'publishing');
CREATE INDEX IF NOT EXISTS jobs_cid ON jobs(cid, id);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
-- The status page's history (publish.status): covering, so its aggregates never read the table itself.
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished, state, size, submitted, repository);
CREATE TABLE IF NOT EXISTS access (
    cid TEXT PRIMARY KEY,
    last_used REAL NOT NULL,
    shared REAL  -- the last_used last written into a repository as a ts/ record (NULL: never)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cleanups (
    repository TEXT PRIMARY KEY,
    day TEXT NOT NULL  -- the local date of the last daily cleanup, so a restart does not repeat it
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Job:
    id: int
    cid: str
    state: str
    spool: str
    size: int
    striplevels: int
    identity: str
    submitted: float
    started: float | None
    finished: float | None
    repository: str | None
    revision: int | None
    files: int | None
    attempts: int
    reason: str | None
    waits: int = 0


_JOB_COLUMNS = (
    "id, cid, state, spool, size, striplevels, identity, submitted, started, finished, repository, "
    "revision, files, attempts, reason, waits"
)


class StateDB(SqliteFile):
    """Thread-safe: one connection, one lock; every call is a short transaction."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA, "synchronous=FULL")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(access)")}
        if "shared" not in columns:  # a state file from before ts/ records
            self._db.execute("ALTER TABLE access ADD COLUMN shared REAL")
        job_columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "waits" not in job_columns:  # a state file from before jobs waited for the storage
            self._db.execute("ALTER TABLE jobs ADD COLUMN waits INTEGER NOT NULL DEFAULT 0")

    # --- the queue -------------------------------------------------------------------------------

    def enqueue(
        self, cid: str, spool: str, size: int, striplevels: int, identity: str, claimed_by: str | None = None
    ) -> int | None:
        """Record an uploaded spool file as a queued job. None if the CID already has an active job.

        ``claimed_by``: a repository whose ingest slot staged the upload as it arrived; the job is recorded
        as publishing there at once (a restart requeues it, as any interrupted job).
        """
        now = time.time()
        state = QUEUED if claimed_by is None else PUBLISHING
        started = None if claimed_by is None else now
        try:
            with self._txn() as db:
                cur = db.execute(
                    "INSERT INTO jobs (cid, state, spool, size, striplevels, identity, submitted, started, "
                    "repository) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (cid, state, spool, size, striplevels, identity, now, started, claimed_by),
                )
                return cur.lastrowid
        except sqlite3.IntegrityError:
            return None

    def active(self, cid: str) -> Job | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE cid = ? AND state IN (?, ?)",
                (cid, QUEUED, PUBLISHING),
            ).fetchone()
        return Job(*row) if row else None

    def active_named(self, name: str) -> list[str]:
        """The active (queued or publishing) CIDs whose first component is ``name``: ``name`` itself and
        ``name/...``. A range on the ``cid`` index, so it stays cheap with a long queue."""
        with self._lock:
            rows = self._db.execute(
                "SELECT cid FROM jobs WHERE (cid = ? OR (cid >= ? AND cid < ?)) AND state IN (?, ?) "
                "ORDER BY id",
                (name, f"{name}/", f"{name}0", QUEUED, PUBLISHING),  # "0" is the character after "/"
            ).fetchall()
        return [str(r[0]) for r in rows]

    def latest(self, cid: str) -> Job | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE cid = ? ORDER BY id DESC LIMIT 1", (cid,)
            ).fetchone()
        return Job(*row) if row else None

    def claim(self, repository: str, max_jobs: int, max_bytes: int, now: float | None = None) -> list[Job]:
        """Move the oldest queued jobs (at least one, then up to the limits) to ``publishing``.

        New jobs first, in order; then retries, the one waiting longest first: a job that keeps failing
        (say, one too big for what is left of the disk) goes to the back each time, after the others.
        """
        now = time.time() if now is None else now
        with self._txn() as db:
            rows = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = ? AND not_before <= ? "
                "ORDER BY not_before, id LIMIT ?",
                (QUEUED, now, max_jobs),
            ).fetchall()
            jobs: list[Job] = []
            total = 0
            for row in rows:
                job = Job(*row)
                # A job that failed once is retried alone, so that it cannot sink a batch twice.
                retried = job.attempts or job.waits
                if jobs and (total + job.size > max_bytes or retried or jobs[0].attempts or jobs[0].waits):
                    break
                jobs.append(job)
                total += job.size
            db.executemany(
                "UPDATE jobs SET state = ?, started = ?, repository = ? WHERE id = ?",
                [(PUBLISHING, now, repository, j.id) for j in jobs],
            )
        return jobs

    def queued(self, limit: int, now: float | None = None) -> list[Job]:
        """Queued jobs due now, in the order ``claim`` takes them (new ones in order, then retries)."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = ? AND not_before <= ? "
                "ORDER BY not_before, id LIMIT ?",
                (QUEUED, now, limit),
            ).fetchall()
        return [Job(*r) for r in rows]

    def claim_job(self, job_id: int, repository: str, now: float | None = None) -> bool:
        """Move one queued job to ``publishing`` (an ingest slot took it); False if it is not queued."""
        now = time.time() if now is None else now
        with self._txn() as db:
            return (
                db.execute(
                    "UPDATE jobs SET state = ?, started = ?, repository = ? WHERE id = ? AND state = ?",
                    (PUBLISHING, now, repository, job_id, QUEUED),
                ).rowcount
                == 1
            )

    def queued_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM jobs WHERE state = ?", (QUEUED,)).fetchone()[0])

    def waiting_count(self) -> int:
        """Queued jobs whose last try failed on the storage (``wait``)."""
        with self._lock:
            return int(
                self._db.execute(
                    "SELECT count(*) FROM jobs WHERE state = ? AND waits > 0", (QUEUED,)
                ).fetchone()[0]
            )

    def next_retry_at(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT min(not_before) FROM jobs WHERE state = ?", (QUEUED,)).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def mark_published(self, jobs: Iterable[tuple[int, int | None]], repository: str, revision: int) -> None:
        """``jobs``: (job id, number of files)."""
        failpoints.hit("state-published")
        now = time.time()
        with self._txn() as db:
            db.executemany(
                "UPDATE jobs SET state = ?, finished = ?, repository = ?, revision = ?, files = ?, reason = NULL "
                "WHERE id = ?",
                [(PUBLISHED, now, repository, revision, files, job_id) for job_id, files in jobs],
            )

    def mark_failed(self, job_id: int, reason: str) -> None:
        with self._txn() as db:
            db.execute(
                "UPDATE jobs SET state = ?, finished = ?, reason = ? WHERE id = ?",
                (FAILED, time.time(), reason, job_id),
            )

    def requeue(self, job_id: int, reason: str, delay: float) -> None:
        """Back to the queue after a failure that was not the tarball's fault (one more attempt)."""
        with self._txn() as db:
            db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, waits = 0, reason = ?, started = NULL, "
                "repository = NULL, not_before = ? WHERE id = ?",
                (QUEUED, reason, time.time() + delay, job_id),
            )

    def wait(self, job_id: int, reason: str, delay: float) -> None:
        """Back to the queue after the storage failed (a full disk...): no attempt is spent."""
        with self._txn() as db:
            db.execute(
                "UPDATE jobs SET state = ?, waits = waits + 1, reason = ?, started = NULL, "
                "repository = NULL, not_before = ? WHERE id = ?",
                (QUEUED, reason, time.time() + delay, job_id),
            )

    def wake_waiting(self) -> int:
        """Make every job waiting for the storage due now (it recovered, or the server restarted)."""
        with self._txn() as db:
            return db.execute(
                "UPDATE jobs SET not_before = 0 WHERE state = ? AND waits > 0 AND not_before > 0", (QUEUED,)
            ).rowcount

    def interrupted(self) -> list[Job]:
        """Jobs a previous process was publishing when it stopped."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = ?", (PUBLISHING,)
            ).fetchall()
        return [Job(*r) for r in rows]

    def reset_to_queued(self, job_ids: Iterable[int]) -> None:
        with self._txn() as db:
            db.executemany(
                "UPDATE jobs SET state = ?, started = NULL, repository = NULL WHERE id = ?",
                [(QUEUED, i) for i in job_ids],
            )

    def active_spools(self) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT spool FROM jobs WHERE state IN (?, ?)", (QUEUED, PUBLISHING)
            ).fetchall()
        return {r[0] for r in rows}

    def prune(self, older_than: float) -> int:
        """Forget finished jobs; the newest job of each CID is kept for ``status``."""
        with self._txn() as db:
            cur = db.execute(
                "DELETE FROM jobs WHERE state IN (?, ?) AND finished < ? "
                "AND id NOT IN (SELECT max(id) FROM jobs GROUP BY cid)",
                (PUBLISHED, FAILED, older_than),
            )
            return cur.rowcount

    # --- access times ----------------------------------------------------------------------------

    def record_access(self, times: dict[str, float]) -> None:
        """Store a batch of last-use times (never moving one backwards)."""
        if not times:
            return
        with self._txn() as db:
            db.executemany(
                "INSERT INTO access (cid, last_used) VALUES (?, ?) "
                "ON CONFLICT(cid) DO UPDATE SET last_used = max(last_used, excluded.last_used)",
                sorted(times.items()),
            )

    def last_used(self, cid: str) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT last_used FROM access WHERE cid = ?", (cid,)).fetchone()
        return float(row[0]) if row else None

    def access_times(self) -> dict[str, float]:
        with self._lock:
            return {c: float(t) for c, t in self._db.execute("SELECT cid, last_used FROM access")}

    def claim_shares(self, min_gap: float, limit: int = 10_000) -> dict[str, float]:
        """Last-use times to write as ts/ records: never written, or newer by ``min_gap`` seconds.

        They are marked written at once, so two workers never write the same ones; ``unshare`` undoes
        that when the revision that carried them failed.
        """
        with self._txn() as db:
            rows = db.execute(
                "SELECT cid, last_used FROM access WHERE shared IS NULL OR last_used - shared > ? LIMIT ?",
                (min_gap, limit),
            ).fetchall()
            db.executemany("UPDATE access SET shared = last_used WHERE cid = ?", [(c,) for c, _ in rows])
        return {c: float(t) for c, t in rows}

    def mark_shared(self, times: dict[str, float]) -> None:
        """Record last-use times as written (ts/ records written with a publish), creating rows as needed."""
        with self._txn() as db:
            db.executemany(
                "INSERT INTO access (cid, last_used, shared) VALUES (?, ?, ?) ON CONFLICT(cid) DO UPDATE SET "
                "last_used = max(last_used, excluded.last_used), shared = max(coalesce(shared, 0), excluded.shared)",
                [(c, t, t) for c, t in sorted(times.items())],
            )

    def unshare(self, cids: Iterable[str]) -> None:
        with self._txn() as db:
            db.executemany("UPDATE access SET shared = NULL WHERE cid = ?", [(c,) for c in cids])

    def forget_access(self, cids: Iterable[str]) -> None:
        with self._txn() as db:
            db.executemany("DELETE FROM access WHERE cid = ?", [(c,) for c in cids])

    def last_cleanup_day(self, repository: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT day FROM cleanups WHERE repository = ?", (repository,)).fetchone()
        return str(row[0]) if row else None

    def record_cleanup_day(self, repository: str, day: str) -> None:
        with self._txn() as db:
            db.execute(
                "INSERT INTO cleanups (repository, day) VALUES (?, ?) "
                "ON CONFLICT(repository) DO UPDATE SET day = excluded.day",
                (repository, day),
            )
