"""Leases on sub-paths of a repository: who may write under a path now, persisted in SQLite.

A publish ingests under a lease on its own path (a CID's or a group's, ``publish.namespace``), not under
the repository, so many publishes of one repository ingest at once and only their short grafts are
serialized. The same table is meant for external writers (the CVMFS-gateway API of issue 15).

Rules
    * A path is relative to the repository root, compared component by component (``sw/a`` and
      ``/sw/a/`` are one path). Two leases **conflict** exactly when one path is a component-wise prefix
      of the other (``sw/g`` and ``sw/g/x`` do; ``sw/g`` and ``sw/gx`` do not), as the gateway's do.
    * A lease has a holder (free text: who holds it, for logs and the status page), an unguessable
      token (``secrets``), and times: acquired, refreshed, expires (= refreshed + ttl). A lease past its
      expiry is dead: it can no longer be refreshed, its holder's work must be refused at graft, and any
      conflicting ``acquire`` removes it. ``expire_due`` removes (and logs) all dead leases.
    * A lease taken by a process of this server records that process (``process``); at start-up,
      ``release_other_processes`` drops every such lease of a process that is gone (their jobs are
      requeued by the service). Leases of external writers (``process`` None) live until they expire.

API (thread-safe, every call one short SQLite transaction)::

    leases = Leases(path_to_state_db)             # its own connection; WAL, busy timeout
    got = leases.acquire(repo, path, holder, ttl) # Lease | Busy(time_remaining, path, holder)
    leases.refresh(token)  -> Lease | None        # None: unknown or expired (lost)
    leases.check(token)    -> Lease | None        # still valid? (no refresh)
    leases.release(token)  -> Lease | None        # None: it was not held (expired or unknown)
    leases.list(repo)      -> list[Lease]         # live leases, by path
    leases.expire_due()    -> list[Lease]         # the dead ones, now removed
"""

from __future__ import annotations

import builtins
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..logs import fields
from .sqlitefile import SqliteFile

log = logging.getLogger("rcds.publish.leases")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    token TEXT PRIMARY KEY,
    repository TEXT NOT NULL,
    path TEXT NOT NULL,  -- normalized: components joined by '/', no leading or trailing '/'
    holder TEXT NOT NULL,
    process TEXT,  -- the server process that took it (NULL: an external writer)
    ttl REAL NOT NULL,
    acquired REAL NOT NULL,
    refreshed REAL NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS leases_path ON leases(repository, path);
"""

_COLUMNS = "token, repository, path, holder, process, ttl, acquired, refreshed, expires"


class LeasePathError(ValueError):
    """A path that cannot be leased (empty, or with '.', '..' or empty components)."""


@dataclass(frozen=True)
class Lease:
    token: str
    repository: str
    path: str
    holder: str
    process: str | None
    ttl: float
    acquired: float
    refreshed: float
    expires: float

    def remaining(self, now: float) -> float:
        return max(0.0, self.expires - now)


@dataclass(frozen=True)
class Busy:
    """``acquire`` refused: a live lease on ``path`` (held by ``holder``) conflicts for ``time_remaining`` s."""

    time_remaining: float
    path: str
    holder: str


def normalize(path: str) -> str:
    """``/sw/a/`` -> ``sw/a``; refuses what could alias another path."""
    parts = [p for p in path.split("/") if p != ""]
    if not parts or any(p in (".", "..") for p in parts) or "\0" in path:
        raise LeasePathError(f"not a leasable path: {path!r}")
    return "/".join(parts)


def conflicts(a: str, b: str) -> bool:
    """One normalized path is a component-wise prefix of the other (or they are equal)."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class Leases(SqliteFile):
    """The lease table in the SQLite file at ``path`` (the service's state DB), with its own connection."""

    def __init__(
        self,
        path: Path,
        process: str | None = None,
        clock: Callable[[], float] = time.time,
        on_expire: Callable[[Lease], None] | None = None,
    ) -> None:
        self.process = process  # recorded with every lease this object acquires for the server itself
        self.clock = clock
        self.on_expire = on_expire  # called (after the transaction) for each lease removed as expired
        super().__init__(path, _SCHEMA, "busy_timeout=30000")

    # --- the API ---------------------------------------------------------------------------------

    def acquire(
        self, repository: str, path: str, holder: str, ttl: float, external: bool = False
    ) -> Lease | Busy:
        """A new lease on ``path``, or Busy naming the live conflicting lease that expires last.

        Dead conflicting leases are removed (and reported as expired). ``external``: the lease belongs to
        an outside writer, not to this process (it survives the process's restart until it expires).
        """
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        path = normalize(path)
        now = self.clock()
        expired: builtins.list[Lease] = []
        with self._txn() as db:
            candidates = [path, *_ancestors(path)]
            marks = ",".join("?" * len(candidates))
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM leases WHERE repository = ? AND "
                f"(path IN ({marks}) OR (path >= ? AND path < ?))",
                (repository, *candidates, f"{path}/", f"{path}0"),  # "0" is the character after "/"
            ).fetchall()
            live: builtins.list[Lease] = []
            for row in rows:
                lease = Lease(*row)
                (expired if lease.expires <= now else live).append(lease)
            if expired:
                db.executemany("DELETE FROM leases WHERE token = ?", [(e.token,) for e in expired])
            if live:
                last = max(live, key=lambda x: x.expires)
                result: Lease | Busy = Busy(last.remaining(now), last.path, last.holder)
            else:
                result = Lease(
                    secrets.token_urlsafe(24), repository, path, holder,
                    None if external else self.process, float(ttl), now, now, now + ttl,
                )  # fmt: skip
                db.execute(
                    f"INSERT INTO leases ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (result.token, result.repository, result.path, result.holder, result.process,
                     result.ttl, result.acquired, result.refreshed, result.expires),
                )  # fmt: skip
        self._expired(expired)
        if isinstance(result, Lease):
            log.info("lease acquired", extra=fields(repository=repository, path=path, holder=holder, ttl=ttl))
        return result

    def refresh(self, token: str, ttl: float | None = None) -> Lease | None:
        """Push the expiry to now + ttl (the lease's own ttl by default). None: the lease is lost."""
        now = self.clock()
        expired: builtins.list[Lease] = []
        with self._txn() as db:
            lease = self._get(db, token)
            if lease is None:
                return None
            if lease.expires <= now:
                db.execute("DELETE FROM leases WHERE token = ?", (token,))
                expired.append(lease)
                refreshed = None
            else:
                ttl = lease.ttl if ttl is None else float(ttl)
                db.execute(
                    "UPDATE leases SET ttl = ?, refreshed = ?, expires = ? WHERE token = ?",
                    (ttl, now, now + ttl, token),
                )
                refreshed = Lease(
                    lease.token, lease.repository, lease.path, lease.holder, lease.process, ttl,
                    lease.acquired, now, now + ttl,
                )  # fmt: skip
        self._expired(expired)
        return refreshed

    def check(self, token: str) -> Lease | None:
        """The lease if it is still live (not expired), without refreshing it."""
        with self._lock:
            lease = self._get(self._db, token)
        return lease if lease is not None and lease.expires > self.clock() else None

    def release(self, token: str) -> Lease | None:
        """Drop a lease. Returns it if it was live; None if it was unknown or already expired."""
        now = self.clock()
        with self._txn() as db:
            lease = self._get(db, token)
            if lease is not None:
                db.execute("DELETE FROM leases WHERE token = ?", (token,))
        if lease is None:
            return None
        if lease.expires <= now:
            self._expired([lease])
            return None
        log.info(
            "lease released",
            extra=fields(repository=lease.repository, path=lease.path, holder=lease.holder,
                         held=round(now - lease.acquired, 3)),
        )  # fmt: skip
        return lease

    def list(self, repository: str | None = None) -> builtins.list[Lease]:
        """The live leases (of one repository, or all), by repository and path."""
        now = self.clock()
        with self._lock:
            if repository is None:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM leases WHERE expires > ? ORDER BY repository, path", (now,)
                ).fetchall()
            else:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM leases WHERE repository = ? AND expires > ? ORDER BY path",
                    (repository, now),
                ).fetchall()
        return [Lease(*r) for r in rows]

    def expire_due(self) -> builtins.list[Lease]:
        """Remove every lease past its expiry; returns them."""
        now = self.clock()
        with self._txn() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM leases WHERE expires <= ?", (now,)).fetchall()
            db.execute("DELETE FROM leases WHERE expires <= ?", (now,))
        expired = [Lease(*r) for r in rows]
        self._expired(expired)
        return expired

    def release_other_processes(self) -> builtins.list[Lease]:
        """At start-up: drop the leases a previous server process took for itself (it is gone)."""
        with self._txn() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM leases WHERE process IS NOT NULL AND process IS NOT ?",
                (self.process,),
            ).fetchall()
            db.executemany("DELETE FROM leases WHERE token = ?", [(r[0],) for r in rows])
        released = [Lease(*r) for r in rows]
        for lease in released:
            log.info(
                "lease released",
                extra=fields(repository=lease.repository, path=lease.path, holder=lease.holder,
                             reason="its process is gone"),
            )  # fmt: skip
        return released

    # --- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _get(db: sqlite3.Connection, token: str) -> Lease | None:
        row = db.execute(f"SELECT {_COLUMNS} FROM leases WHERE token = ?", (token,)).fetchone()
        return Lease(*row) if row else None

    def _expired(self, leases: builtins.list[Lease]) -> None:
        for lease in leases:
            log.warning(
                "lease expired",
                extra=fields(repository=lease.repository, path=lease.path, holder=lease.holder,
                             late=round(self.clock() - lease.expires, 3)),
            )  # fmt: skip
            if self.on_expire is not None:
                self.on_expire(lease)
