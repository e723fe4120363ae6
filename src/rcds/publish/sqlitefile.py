"""One SQLite file shared by the service's threads: one connection behind one lock, short transactions."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SqliteFile:
    """Base of the service's SQLite stores (the job queue, the lease table): WAL, autocommit off only
    inside ``_txn`` (``BEGIN IMMEDIATE``: a writer waits for another at the start, never half-way)."""

    def __init__(self, path: Path, schema: str, *pragmas: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        for pragma in ("journal_mode=WAL", *pragmas):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
