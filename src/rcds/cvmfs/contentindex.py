"""The content index: which stored object(s) hold a piece of content, by the SHA-256 of its uncompressed
bytes, so that content met again (a re-publish, a file in many CIDs) costs one hash and no compression.

A SQLite table beside the repository (``.rcds/content-index.db``), shared by the transactions, the
stagings, their small-file worker processes (which only read it) and garbage collection (which forgets
what it swept). Entries are recorded only after the objects they name are durable.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path


class ContentIndex:
    """SQLite map: SHA-256 of uncompressed bytes (+ kind) -> stored object(s). Safe across threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        # Several writers at once (staged ingests, a transaction, GC): WAL, and waiting for each other.
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=60)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS pieces (key BLOB PRIMARY KEY, value BLOB NOT NULL)")
        self._pending: list[tuple[bytes, bytes]] = []

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            row = self.db.execute("SELECT value FROM pieces WHERE key = ?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    def get_many(self, keys: list[bytes]) -> dict[bytes, bytes]:
        """The entries of those ``keys`` the index has (one query for a batch of small files)."""
        if not keys:
            return {}
        marks = ",".join("?" * len(keys))
        with self._lock:
            rows = self.db.execute(f"SELECT key, value FROM pieces WHERE key IN ({marks})", keys).fetchall()
        return {bytes(k): bytes(v) for k, v in rows}

    def put(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self._pending.append((key, value))

    def flush(self) -> None:
        """Persist the entries recorded since the last flush (after their objects are durable)."""
        with self._lock:
            if self._pending:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany("INSERT OR REPLACE INTO pieces (key, value) VALUES (?, ?)", self._pending)
                self.db.execute("COMMIT")
                self._pending.clear()

    def discard_pending(self) -> None:
        with self._lock:
            self._pending.clear()

    def remove_objects(self, digests: Iterable[bytes]) -> int:
        """Forget entries pointing at objects that were swept (used by garbage collection)."""
        with self._lock:
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS swept (digest BLOB PRIMARY KEY) WITHOUT ROWID")
            self.db.executemany(
                "INSERT OR IGNORE INTO temp.swept (digest) VALUES (?)", ((d,) for d in digests)
            )
            try:
                return self._remove_listed("temp.swept")
            finally:
                self.db.execute("DELETE FROM temp.swept")

    def remove_objects_listed(self, database: Path, table: str) -> int:
        """Forget entries pointing at an object whose digest is in ``table`` of the SQLite ``database``.

        For millions of swept objects: the table (a ``digest BLOB`` column, indexed) stays on disk and the
        matching runs inside SQLite. A file's chunk list is forgotten if any of its chunks is listed.
        """
        with self._lock:
            self.db.execute("ATTACH DATABASE ? AS listed", (str(database),))
            try:
                return self._remove_listed(f"listed.{table}")
            finally:
                self.db.execute("DETACH DATABASE listed")

    def _remove_listed(self, table: str) -> int:
        """Delete entries naming an object in ``table``; the caller holds ``_lock``."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            removed = self.db.execute(
                f"DELETE FROM pieces WHERE length(value) = 20 AND value IN (SELECT digest FROM {table})"
            ).rowcount
            doomed = [
                (key,)
                for key, value in self.db.execute("SELECT key, value FROM pieces WHERE length(value) != 20")
                if any(
                    self.db.execute(f"SELECT 1 FROM {table} WHERE digest = ?", (d,)).fetchone()
                    for d in _object_digests(bytes(value))
                )
            ]
            self.db.executemany("DELETE FROM pieces WHERE key = ?", doomed)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return removed + len(doomed)

    def close(self) -> None:
        self.flush()
        self.db.close()


def _object_digests(value: bytes) -> list[bytes]:
    """The object digests a chunk-list value of the index names (36 bytes per chunk)."""
    return [value[i + 16 : i + 36] for i in range(0, len(value) - 35, 36)]
